#!/usr/bin/env bash
# Real-host tests: the WebUI script inside AUTOMATIC1111 WebUI v1.10.1 and inside SD WebUI Forge f2.0.1 (dfdcbab6),
# and the ComfyUI nodes inside ComfyUI 0.3.64, each started offline on 127.0.0.1 from the source tarballs in
# $IMAGEREWARD_HOSTS (default ../shared/hosts).
#
#   bash scripts/test-hosts.sh [webui|forge|comfyui|all]
#   bash scripts/test-hosts.sh --screenshots docs/images [webui|comfyui|all]   # README's screenshots instead
#
# Per host: a throwaway copy of the host tree, its own venv (host packages as its docs say), this library installed
# exactly as README.md tells users (pip install --no-deps, then the plugin copied/linked), a check that no host
# package changed, then scripts/host_checks.py (run by the host's Python) drives the host over HTTP and prints one
# result line. IMAGEREWARD_HOST_VENVS=DIR keeps the venvs, the Hub cache and the random SD checkpoint in DIR so
# that reruns take minutes, not a quarter of an hour. Each host needs ~5 GB of RAM: they run one at a time, under
# flock /tmp/ir-bigmem.lock. --screenshots DIR runs scripts/host_screenshots.py instead of the checks (same hosts,
# same setup; a small venv with playwright drives Debian's /usr/bin/chromium) and writes DIR/{webui,comfyui}-plugin.png.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
HOSTS=$(cd "$REPO" && realpath "${IMAGEREWARD_HOSTS:-../shared/hosts}")
SHOTS=
if [ "${1:-}" = --screenshots ]; then SHOTS=$(realpath -m "${2:?--screenshots needs a folder}"); shift 2; fi
WHICH=${1:-all}
WORK=$(mktemp -d /tmp/ir-hosts.XXXXXX)
KEEP=${IMAGEREWARD_HOST_VENVS:-}
CACHE=${KEEP:-$WORK/cache}
mkdir -p "$CACHE"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export HF_HOME=$CACHE/hf-home  # the WebUI reads the CLIP tokenizer from this Hub cache (built by host_checks.py)
unset PYTHONPATH
PY=${PYTHON:-python3}
status=0

log() { echo "[test-hosts] $*" >&2; }

# venv NAME REQUIREMENTS... : create (or reuse) $CACHE/venv-NAME with the host's packages
venv() {
    local name=$1; shift
    local dir=$CACHE/venv-$name
    local stamp
    stamp=$(echo "$*" | sed "s#$WORK##g" | sha256sum | cut -c1-16)
    if [ ! -f "$dir/.ready-$stamp" ]; then
        log "$name: creating $dir (torch + the host's requirements; a few minutes)"
        rm -rf "$dir"
        "$PY" -m venv "$dir" >&2
        "$dir/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1 >&2
        while [ $# -gt 0 ]; do "$dir/bin/python" -m pip install -q $1 >&2; shift; done
        touch "$dir/.ready-$stamp"
    fi
    echo "$dir"
}

# shots_venv : (re)use $CACHE/venv-shots, playwright + Pillow only (the browser: Debian's chromium, no
# `playwright install`)
shots_venv() {
    local dir=$CACHE/venv-shots
    if [ ! -f "$dir/.ready" ]; then
        log "creating $dir (playwright)"
        rm -rf "$dir"
        "$PY" -m venv "$dir" >&2
        "$dir/bin/python" -m pip install -q playwright pillow >&2
        touch "$dir/.ready"
    fi
    echo "$dir"
}

# install_library VENV : README's step, then prove the host's pinned packages are untouched
install_library() {
    local py=$1/bin/python before after
    before=$("$py" -m pip freeze | grep -vi '^image-reward' | sort)
    log "pip install --no-deps $REPO"
    "$py" -m pip install -q --no-deps "$REPO"
    after=$("$py" -m pip freeze | grep -vi '^image-reward' | sort)
    if [ "$before" != "$after" ]; then
        echo "installing the library changed the host's packages:"; diff <(echo "$before") <(echo "$after") || true
        return 1
    fi
    (cd "$WORK" && "$py" -c "import ImageReward, transformers, PIL; print('[test-hosts] ImageReward', \
ImageReward.__file__, 'transformers', transformers.__version__, 'Pillow', PIL.__version__)" >&2)
}

run_host() {  # NAME: one host, start to finish; prints its result line
    local name=$1 started=$SECONDS tree venv_dir
    local extra=()
    if [ "$name" = webui ]; then
        tar -xJf "$HOSTS/stable-diffusion-webui-v1.10.1.tar.xz" -C "$WORK"
        tree=$WORK/stable-diffusion-webui
        venv_dir=$(venv webui "-r $tree/requirements_versions.txt" "openai-clip==1.0.1")
        install_library "$venv_dir"
        cp "$REPO/sdwebui/image_reward.py" "$tree/scripts/"          # README, WebUI step 3
    elif [ "$name" = forge ]; then
        tar -xJf "$HOSTS/stable-diffusion-webui-forge-dfdcbab6.tar.xz" -C "$WORK"
        tree=$WORK/stable-diffusion-webui-forge
        # what Forge's launcher would clone (the same commits as A1111's), and A1111's ldm code, which builds the
        # random SD checkpoint when no webui run has cached it yet
        mkdir -p "$WORK/a1111-for-forge"
        tar -xJf "$HOSTS/stable-diffusion-webui-v1.10.1.tar.xz" -C "$WORK/a1111-for-forge"
        cp -r "$WORK/a1111-for-forge/stable-diffusion-webui/repositories/"{BLIP,stable-diffusion-webui-assets} \
            "$tree/repositories/"
        extra=(--sd-code "$WORK/a1111-for-forge/stable-diffusion-webui")
        venv_dir=$(venv forge "-r $tree/requirements_versions.txt")
        install_library "$venv_dir"
        cp "$REPO/sdwebui/image_reward.py" "$tree/scripts/"          # README, WebUI step 3 (Forge: the same)
    else
        tar -xJf "$HOSTS/ComfyUI-a125cd84.tar.xz" -C "$WORK"
        tree=$WORK/ComfyUI
        # PyPI's newest torchaudio beside the torch installed first (it needs torch >= 2.11 and leaves it as is):
        # 0.3.64 only imports it in its audio nodes, newer ComfyUI (0.33) at start-up (comfy/sd.py)
        sed 's/^torchaudio.*/torchaudio==2.11.1/' "$tree/requirements.txt" > "$WORK/comfy-requirements.txt"
        venv_dir=$(venv comfyui "-r $WORK/comfy-requirements.txt" "requests")
        install_library "$venv_dir"
        ln -s "$REPO/comfyui" "$tree/custom_nodes/ImageReward"        # README, ComfyUI step 2
    fi
    local driver=("$venv_dir/bin/python" "$REPO/scripts/host_checks.py" "$name" "${extra[@]}")
    if [ -n "$SHOTS" ]; then
        driver=("$(shots_venv)/bin/python" "$REPO/scripts/host_screenshots.py" "$name"
                --host-python "$venv_dir/bin/python" --out "$SHOTS")
    fi
    (cd "$WORK" && flock /tmp/ir-bigmem.lock "${driver[@]}" --host-dir "$tree" --cache "$CACHE" --work "$WORK") \
        || status=1
    log "$name: $((SECONDS - started)) s in all (installs and the wait for the memory lock included)"
}

main() {
    case "$WHICH" in
        webui|comfyui) run_host "$WHICH" ;;
        forge) [ -z "$SHOTS" ] || { echo "no screenshots of Forge: webui or comfyui" >&2; exit 2; }; run_host forge ;;
        # webui first: it builds the random SD checkpoint that Forge and ComfyUI use too
        all) run_host webui; [ -n "$SHOTS" ] || run_host forge; run_host comfyui ;;
        *) echo "usage: $0 [--screenshots DIR] [webui|forge|comfyui|all]" >&2; exit 2 ;;
    esac
    exit $status
}
# bash reads a script as it runs it: editing this file during a (long) run used to end that run with a syntax
# error ("line 89: syntax error near unexpected token ';;'"). Everything above only defines things, and this last
# line is parsed before anything runs, so a run finishes the version it started with.
main "$@"
