"""Pure tensor code under every algorithm: parameter dicts, the batched MLP, per-task losses, execution."""
