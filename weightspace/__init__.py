"""Weight-space analysis: stream checkpoints, compare updates, project them onto or away from subspaces.

The study (``docs/study.md``, experiments 1-3): given an aligned model ``W_A`` and fine-tuned models
``W_FT``, compute the updates ``Delta = W_FT - W_A`` tensor by tensor (float32, never whole models in
memory), build reference subspaces (top-k singular vectors of a reference update, random controls, or
the span of activation-space directions), and measure how much of each update lives there (energy kept
E_k, mode subspace overlap MSO, principal angles, flattened cosine), per tensor, layer, module type and
model. Projected checkpoints (``W_A + P Delta``, ``W_A + (I - P) Delta``, ``W_A - P Delta``) are written
in the original dtype and load with plain ``transformers``.

Modules (one concept each):

* :mod:`weightspace.checkpoints` - read safetensors checkpoints one tensor at a time.
* :mod:`weightspace.naming` - map tensor names to layer / module type / orientation.
* :mod:`weightspace.plan` - match tensor names and shapes across checkpoints; select tensors.
* :mod:`weightspace.deltas` - float32 deltas (whole or in row blocks).
* :mod:`weightspace.grouping` - energy / cosine / overlap sums per tensor, layer, module, model.
* :mod:`weightspace.spectral` - one SVD per tensor, then bases for eta / rho grids (core math reused).
* :mod:`weightspace.reference` - reference subspaces (delta or activation directions) per tensor.
* :mod:`weightspace.writer` - stream a safetensors file to disk atomically; copy config/tokenizer.
* :mod:`weightspace.projection` - the ``project`` driver (one projected checkpoint + report).
* :mod:`weightspace.overlap` - the ``overlap`` driver (experiment 3).
* :mod:`weightspace.pools` - disjoint prompt pools (recipes, refusal direction, harm evaluation).
* :mod:`weightspace.evaluation` - score an in-memory model (utility, harmfulness) with per-prompt rows.
* :mod:`weightspace.sweep` - the ``sweep`` driver (experiments 1 and 2).
* :mod:`weightspace.plots` - PNG figures.
* :mod:`weightspace.synthetic` - seeded synthetic fine-tunes (benchmarks, demos).
* :mod:`weightspace.cli` - ``workbench weightspace overlap|project|sweep``.
"""
