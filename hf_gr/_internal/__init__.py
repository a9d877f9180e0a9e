"""hf_gr's internals: the phases of a GR step and their helpers. Nothing here is public API: import from `hf_gr`.

- `schedule`: plan (which steps are GR steps, λ_t, r_t; `StepPlanner`)
- `passes`: passes (a micro-batch's forward-backward passes, the perturbation and its restore; `GRPasses`)
- `combine`: combine (each parameter's update gradient into `.grad`)
- `metrics`, `record`: record (the metrics until the log, `gr_sharpness`; which settings ran over which steps)
- `gradient` (the math on lists of tensors), `sync` (DDP and FSDP2), `replay` (random masks, BatchNorm),
  `reuse` (LookSAM), `ascent` (sub-batch ascent), `checkpoint` and `hub` (resume and model card helpers)
"""
