"""Generated data: seed plans, the Ray Data generation job, selection views, baselines and quality measures.

- `plan`: the seed plan and identity of a generated set (pure).
- `generate_job`: `run_generate(cfg)`, the Ray Data generation job.
- `scoring`: `score_store` / `second_scores`, the scoring pass over a store (a Ray Data job too).
- `pools`: the sampler/scorer actor pools' resources, shared by both jobs.
- `actors` / `generators`: the job's sampler/scorer/writer actors (plain classes Ray Data runs) and the generator
  registry.
- `select`: selection policies and views (`build_view`, `load_view`, `describe`).
- `gaussian`: the class-conditional Gaussian generator (Rebuffi et al. 2021 App. D).
- `quality`: scorer outputs and Fréchet distances ("FD (scorer features)"; Inception FID from a user file).

Submodules are imported on demand: `generate_job` and `scoring` pull in Ray, the rest does not.
"""
