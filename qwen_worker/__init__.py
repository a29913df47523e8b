"""Worker side of qwen-batch: load a Qwen-Image pipeline once, render rows, store images.

Nothing here knows about jobs, manifests or schedules (see DESIGN.md: `jobs` imports
`qwen_worker`, never the other way round). Heavy libraries are imported inside functions.
"""
