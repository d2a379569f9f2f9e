"""The paper's robustness experiment in miniature: ``python -m hyzo.demo``.

"Downgrade to Upgrade" (Lang et al., arXiv 2510.00761) finds that unlearning with
downgraded optimizers (zeroth-order, sign-compressed, and a hybrid of first-order and
zeroth-order blocks) is harder to undo by weight quantization and by relearning. This demo
runs a TOFU-style experiment at laptop scale, every optimizer through ``hyzo.torch``:

1. invents people with attributes (city, job, colour, pet) from a seed, and a word-level
   tokenizer for the facts ("<first> <last> lives_in <city>");
2. trains a small causal transformer with AdamW until it reproduces every fact, then
   releases it as an int4 checkpoint: every weight matrix snapped to symmetric 4-bit,
   groups of 32 along each row; unlearning starts from the dequantized weights (the
   assumption built in: the model sits on the attack's grid, as a released int4 model does);
3. unlearns the forget set (10% of the people) with GradDiff and with NPO, at one learning
   rate (1e-4) for every optimizer, each stopped when the forget accuracy first reaches
   each target (<= 0.25, then <= 0.1; at most 800 steps, 400 for pure ZO, whose steps cost
   8 forward passes each): AdamW, Signum, the hybrid (10 AdamW steps, 10 AdaZO steps,
   separate states), zeroth-order AdaZO, and controls: (a) AdamW plus ONE seeded Gaussian
   displacement of every weight with the RMS of the hybrid's summed zeroth-order changes
   (``perturb_``, hyzo's seeded perturbation pass), (b) "null ZO", the hybrid whose
   zeroth-order steps are fed a standard normal draw instead of the loss (the same
   directions and rule, no information about the objective; AdaZO divides by the root of
   its second moment, so the draw's scale does not matter), (c) the displacement of (a) on
   the base model, without unlearning;
4. attacks each unlearned model: re-quantization with the base's scheme (4-bit, groups of
   32), per-channel 4-bit and per-channel 8-bit round-to-nearest, loading in 4 and 8 bits
   as bitsandbytes does (NF4 and FP4 with blocks of 64, LLM.int8; the Linear weights
   transformers would quantize, through ``hyzo._quantization``), and relearning (K AdamW
   steps on half the forget set, scored on the held-out half);
5. prints a table per objective and target, writes a PNG and ``results.json``.

Nothing is tuned to make a method win: one learning rate, matched forget targets, and the
controls decide what may be claimed. ``--seeds N`` repeats everything (world, model,
directions) for N seeds and reports mean +- std.
"""

from __future__ import annotations

# The rooms: experiment (the sizes, the progress log, one seed's run), world (the invented
# facts), model (the transformer and its pre-training), objectives (GradDiff, NPO),
# controls (the optimizers and controls compared, and the unlearning run), attacks
# (quantization, bitsandbytes' loading, relearning, the measurements), report
# (aggregation, tables, verdict, plot), __main__ (the command line).
