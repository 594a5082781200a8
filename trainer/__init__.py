"""The training loop's parts; `train.py` at the repository root puts them together.

    config       typed schemas of every config group (Hydra's ConfigStore)
    state        TrainState: step, data position, tokens seen: what a resume continues from
    tasks        TranslationTask and LanguageModelTask: data, model, loss, evaluation, metric
    optim        build_optimizer(cfg.optim, params)
    schedule     build_scheduler(cfg.schedule, optimizer, max_steps): warm-up and cool-down
    checkpoint   Checkpointer: save / load, single files or sharded (FSDP) directories
    trained      a trained run's checkpoint and model, to use (scripts/translate.py, sample.py, trainer.init_from)
    runlog       RunLog: config.yaml, metrics.jsonl, summary.json and Weights & Biases
    distributed  device, torchrun / SLURM process groups, FSDP sharding, collectives
    bernoulli    torch's CPU dropout masks, drawn ~10x faster by a C++ kernel (the same masks)
    preemption   Preemption: SIGTERM / SIGINT become a checkpoint and a requeue exit status
    errors       the exceptions that become one `error:` line and an exit status
"""
