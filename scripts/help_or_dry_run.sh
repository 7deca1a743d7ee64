# Sourced by the training scripts (train_refl.sh, train_refl_sdxl.sh, train/scripts/train_one_node.sh):
#   source "$(dirname "$0")/help_or_dry_run.sh"; help_or_dry_run "$(dirname "$0")/../refl.py" "$@"   (before any cd)
# --help / -h: print the calling script's comment header and the program's own help, then exit (nothing is
# downloaded or launched). --dry_run / --dry-run: sets DRY_RUN=1 (the script then runs one checking process).
DRY_RUN=0
help_or_dry_run() {
  local program="$1"; shift  # the Python entry point whose --help follows the script's own
  local arg
  for arg in "$@"; do
    case "$arg" in
      -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; echo; exec python "$program" --help ;;
      --dry_run|--dry-run) DRY_RUN=1 ;;
    esac
  done
}
