"""Logical axis names carried by every parameter, in one place.

Each `nnx.Param` in this package is created with `nnx.with_partitioning(...)`,
which stores a tuple of logical axis names (one per array dimension) in the
variable's `out_sharding` metadata. Nothing is sharded eagerly: a later mesh
maps the names to mesh axes with a rule table, e.g.::

    rules = (("vocab", "tp"), ("heads", "tp"), ("kv_heads", "tp"),
             ("mlp", "tp"), ("embed", "fsdp"))
    specs = nnx.get_partition_spec(nnx.state(model))  # logical names
    # then flax.linen.logical_to_mesh_sharding(specs, mesh, rules) or similar.

Axis names:
  VOCAB: token vocabulary (embedding rows, LM-head columns).
  EMBED: the residual stream / model width.
  HEADS: flattened query heads x head_dim (q projection out, o projection in).
  KV_HEADS: flattened key/value heads x head_dim (k/v projections out).
  MLP: MLP hidden width.
  POSITION: learned absolute positions (GPT-2).
  HEAD_DIM: width of one head (Phi's per-head q/k LayerNorm).
  LORA_RANK: LoRA bottleneck; never worth sharding, kept unnamed (None).
"""

VOCAB = "vocab"
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
MLP = "mlp"
POSITION = "position"
HEAD_DIM = "head_dim"
LORA_RANK = None

AxisNames = tuple[str | None, ...]
