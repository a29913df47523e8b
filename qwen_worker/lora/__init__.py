"""LoRA adapters: per row, on any transformer the workers load, DF11 included.

- `spec`: what a row asks for (`brand-x.safetensors:0.8`, a list of them) and where the file is.
- `format`: the key formats LoRA files come in (diffusers/PEFT, Kohya, the lightx2v Lightning files),
  read from a safetensors header (validation) or from the tensors (workers), checked against the
  transformer's own Linear layers.
- `hooks`: applies the active adapters beside the weights (a forward hook per target Linear adds
  scale * B(A x)), never merged: DFloat11 deletes each Linear's weight and decodes it into a shared
  buffer before each block runs, so there is no weight to merge into, and a hook sees the decoded
  weight's output whatever holds it (dfloat11 on a GPU, our codec on the CPU, plain BF16).
- `cache`: adapters a worker keeps loaded, bounded by bytes, so switching between micro-batches
  costs no reload.
"""
