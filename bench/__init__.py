"""The speed lab: `make bench` (python -m bench) runs this repo's GRPO loop against TRL's GRPOTrainer on one
run, and its satellites time one half of the bench's step at a time. None of it is part of the library
(src/online_rl); it drives the library from outside, as a user's run does. Run it from the repository root.

- __main__: the command line of `python -m bench` (arms in processes of their own, then the report);
- settings: the bench's step (Settings), its arms, and `--set key=value`;
- arms: our loop, TRL's GRPOTrainer and the floor, each run inside an arm's process;
- trl_sweep: one TRL run, and TRL at its best (its anchor and candidates in one process, the fastest kept);
- shapes: issue 27's <date>-shapes.json (one object per shape and arm) and the sums of its fields;
- halves: the step's halves alone, with our code: one rollout, one optimizer step;
- summary: an arm's raw measurements as a row, the ratios to TRL and issue 6's targets;
- report: the results files (.json, .md, .png);
- host: the machine a command ran on (CPUs' speed at Python, CPU and GPU kinds, peak GPU memory);
- processes: what the processes of a command share (environment, CUDA's MPS daemon, stopping on SIGTERM);
- gen_speed, train_speed (through speed_variants): the rollout alone, and the optimizer step alone, under
  variants; engine_process_cpu: vLLM's engine process on a CPU.
"""
