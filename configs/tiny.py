"""A seconds-long smoke test on the embedded digits: tiny U-Net, T=20. Used by the test suite."""

from configs import digits


def get_config():
  config = digits.get_config()
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.dropout = 0.1
  config.diffusion.num_timesteps = 20
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 2
  config.optim.lr_schedule = 'constant'  # tests resume runs with a changed num_train_steps
  config.training.batch_size = 16
  config.training.num_train_steps = 4
  config.training.log_every = 2
  config.training.checkpoint_every = 2
  config.training.ema_decay = 0.9
  config.training.num_grid_samples = 8
  config.training.final_eval = False
  config.eval.metrics = ('bpd', 'digits_fid')
  config.sampling.method = 'ancestral'
  config.sampling.timestep_respacing = ''
  config.sampling.interpolation_t = 10
  config.sampling.num_samples = 16
  config.sampling.batch_size = 8
  config.sampling.samples_per_shard = 8
  config.eval.batch_size = 8
  config.eval.num_examples = 16
  config.eval.num_train_examples = 16
  config.eval.fid_num_samples = 16
  return config
