"""The embedded default: scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the package, no network).

A small U-Net sized to train to recognisable digits on a 2-core CPU within minutes; then samples and
the digits Fréchet distance (classifier features) are reported, so a newcomer sees a number, not only a picture.
Budget on a 2-core CPU (see README): 2,000 steps (one JAX device per core; the learning rate falls along a
cosine after the warm-up), then a 100-sample grid and 1,000 samples with 50 DDIM steps for the metric. Why this
recipe (cosine, DDIM 50) and not DDPM's (constant rate, more sampling steps): BENCHMARKS.md, "The digits recipe".
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'digits'
  config.data.image_size = 8
  config.data.num_channels = 1
  config.data.random_flip = False
  config.data.shuffle_buffer = 2_000
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.dropout = 0.0
  config.diffusion.num_timesteps = 1000
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 200
  config.optim.lr_schedule = 'cosine'  # over 5 sampling seeds: Fréchet distance 1.13x the floor vs 1.18x constant
  config.training.batch_size = 64
  config.training.num_train_steps = 2_000
  config.training.ema_decay = 0.995
  config.training.log_every = 250
  config.training.sample_every = 0
  config.training.checkpoint_every = 500
  config.training.num_grid_samples = 100
  config.training.final_eval = True
  # 50 DDIM steps: within the CPU budget, and closer to the real digits than 100 for this short training
  # (BENCHMARKS.md); the paper's sampler: --config.sampling.method=ancestral --config.sampling.timestep_respacing=''
  config.sampling.method = 'ddim'
  config.sampling.timestep_respacing = 'ddim50'
  config.sampling.num_samples = 1_000
  config.sampling.batch_size = 500
  config.sampling.samples_per_shard = 500
  config.eval.metrics = ('digits_fid',)  # bits/dim: --mode=eval --config.eval.metrics='("bpd",)'
  config.eval.batch_size = 120  # divides the 360 held-out digits: no padded work in the bound
  config.eval.num_examples = 360
  config.eval.num_train_examples = 360
  config.eval.fid_num_samples = 1_000
  return config
