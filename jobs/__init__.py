"""Driver side of qwen-batch: manifests, planning, ledger, runner, scheduler and the CLI."""
