"""Evaluation room: how robust is a trained classifier.

- `metrics`: clean and PGD accuracy as pure functions (per-example flags, explicit generators).
- `autoattack`: AutoAttack (pyautoattack) with its per-attack cascade, exact aggregation over shards, resume.
- `certify`: randomized-smoothing certification (Cohen et al. 2019).
- `checks`: gradient-masking checks (accuracy vs eps, vs steps).
- `report`: results as plain data, MLflow metric names, the printed table.
- `export`: RobustBench DMWideResNet checkpoints out and in.
- `chunk`: what one chunk computes (measures, per-chunk seeds, the checks' settings), in any process.
- `job`: the Ray Data driver (the only Ray code here): `run_eval(run_dir_or_checkpoint)`, sharded and resumable.

Nothing is imported here, so `import raylab.eval.metrics` stays light (no Ray, no pyautoattack).
"""
