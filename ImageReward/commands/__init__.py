"""Subcommands of the ``imagereward`` CLI, one module each (see ``ImageReward.cli``)."""
