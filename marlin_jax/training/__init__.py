"""The training harness shared by pretraining and fine-tuning: the loop, checkpoints, evaluators, sharding,
schedules, run control and reporting."""
