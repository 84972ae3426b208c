"""`dml tune`: a fair hyperparameter search ("A Metric Learning Reality Check" protocol).

The training classes are split into k class-disjoint folds; a trial trains k ordinary
`dml train` runs (each fold held out once) and scores their mean validation MAP@R; an Optuna
study on RDB storage (SQLite in the study folder by default) chooses the trials; the best
trial's values are retrained with n seeds and evaluated once on the held-out test classes.
See `dml.tune.run.run_tune`.
"""
