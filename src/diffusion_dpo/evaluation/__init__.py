"""Evaluation and AI feedback: `generate` (paired samples: the same noise per (prompt, seed) in every model),
`compare` (scores, paired win rates with intervals, effect sizes, the comparison's report), `rewards/` (the reward
models), `relabel` (AI-feedback labels), `prompts` (prompt sets), `diversity`, `grids` (validation sample grids)
and `plots`."""
