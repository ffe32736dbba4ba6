"""Scaling-law sweeps: plan an IsoFLOP grid, launch it, collect results, fit and plot them.

    spec.py     the sweep configuration (configs/sweep/*.yaml), validated
    grid.py     the size rule and the IsoFLOP plan (per-architecture FLOPs per token, not 6N)
    runner.py   run status (done / partial / pending), local launch, Slurm job arrays
    collect.py  metrics.jsonl of every run -> one CSV
    fit.py      L(N, D) = E + A/N^alpha + B/D^beta (Huber in log space) and IsoFLOP parabolas
    plot.py     IsoFLOP curves, loss-compute frontier, optimal N and D against compute
    cli.py      `python tools/sweep.py {plan,launch,collect,fit,plot,all}`
"""
