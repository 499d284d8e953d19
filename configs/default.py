"""The whole configuration tree of ddpm_jax, with DDPM's CIFAR10 recipe as the defaults.

Experiment files (`configs/cifar10.py`, ...) start from `get_config()` here and override fields.
Every field can also be overridden on the command line, e.g. `--config.training.batch_size=64`.
Fields are validated once, in `ddpm_jax.config.validate_config`, before anything compiles.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # --- training (DDPM §4, Appendix B) ---
  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128            # global batch, over all devices and hosts
  training.num_train_steps = 800_000
  training.log_every = 100             # metrics are fetched from the device only on these steps
  training.sample_every = 10_000       # PNG grid of EMA samples; 0 disables
  training.num_grid_samples = 64
  training.checkpoint_every = 10_000
  training.keep_checkpoints = 3
  training.ema_decay = 0.9999
  training.importance_sampling = False  # iDDPM §3.3 loss-second-moment timestep sampler
  training.distributed = False          # call jax.distributed.initialize() (multi-host)
  training.final_eval = False           # run the eval metrics after the last step

  # --- data ---
  config.data = data = ml_collections.ConfigDict()
  # a tfds name (cifar10, mnist, celeb_a_hq/256, lsun/church_outdoor...), 'digits' or 'image_folder'
  data.dataset = 'cifar10'
  data.image_size = 32
  data.num_channels = 3
  data.random_flip = True
  data.train_split = 'train'
  data.eval_split = 'test'
  data.data_dir = ml_collections.config_dict.placeholder(str)      # tfds data_dir
  data.image_folder = ml_collections.config_dict.placeholder(str)  # for dataset='image_folder'
  data.shuffle_buffer = 10_000
  data.in_memory = ml_collections.config_dict.placeholder(bool)  # None: the source's default (small sets in memory)
  data.prefetch = 2

  # --- model: the DDPM U-Net (DDPM §4, Appendix B; iDDPM options) ---
  config.model = model = ml_collections.ConfigDict()
  model.name = 'unet'
  model.ch = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.num_heads = 1
  model.scale_shift_norm = False
  model.dropout = 0.1
  model.resamp_with_conv = True
  model.learn_sigma = False      # 2C output channels; required by var_type learned / learned_range
  model.num_classes = 0          # > 0: class-conditional (iDDPM's class_cond), label embedding
  model.dtype = 'float32'        # computation dtype: float32 | bfloat16 (parameters stay float32)
  # Kernel of jax.nn.dot_product_attention: None lets JAX choose; 'xla'; 'cudnn' (fused, GPU + bfloat16).
  model.attn_implementation = ml_collections.config_dict.placeholder(str)
  # The code the weights come from (layers.CONVENTIONS): 'diffusion_tf' (DDPM) or 'improved_diffusion'
  # (its released .pt models: GroupNorm eps, timestep embedding, downsampling padding).
  model.conventions = 'diffusion_tf'

  # --- diffusion (DDPM §2-3, iDDPM §3) ---
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.num_timesteps = 1000
  diffusion.beta_schedule = 'linear'
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  diffusion.mean_type = 'eps'          # eps | x0 | xprev
  diffusion.var_type = 'fixed_large'   # fixed_small | fixed_large | learned | learned_range
  diffusion.loss_type = 'mse'          # mse | rescaled_mse | kl | rescaled_kl | hybrid
  diffusion.hybrid_lambda = 0.001      # lambda of L_hybrid = L_simple + lambda L_vlb (iDDPM §3.1)
  # improved-diffusion's conventions (README "improved-diffusion conventions"):
  diffusion.rescale_timesteps = False  # the network sees t * 1000 / T (float) instead of int t
  diffusion.rescale_learned_sigmas = False  # loss_type 'mse' + learned variance -> 'rescaled_mse'

  # --- optimizer ---
  config.optim = optim = ml_collections.ConfigDict()
  optim.optimizer = 'adam'       # adam | adamw
  optim.learning_rate = 2e-4
  optim.beta1 = 0.9
  optim.beta2 = 0.999
  optim.eps = 1e-8
  optim.weight_decay = 0.0       # adamw only
  optim.warmup_steps = 5000
  # After the warm-up: 'constant' (DDPM) | 'cosine' (down to 0 at training.num_train_steps; raising that field
  # when resuming moves the end, and the rate jumps up to the longer cosine's value at the current step).
  optim.lr_schedule = 'constant'
  optim.grad_clip = 1.0          # global norm; 0 disables

  # --- sampling (DDPM Alg. 2, iDDPM §4, DDIM) ---
  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.method = 'ancestral'        # ancestral | ddim
  sampling.timestep_respacing = ''     # '' = all T steps; '250', '10,10,10' or 'ddim50'
  sampling.ddim_eta = 0.0
  sampling.clip_denoised = True
  sampling.use_ema = True
  sampling.num_samples = 50_000
  sampling.batch_size = 256            # global batch
  sampling.samples_per_shard = 2_048   # samples per .npz shard (resumable unit)
  sampling.progressive_every = 100     # DDPM §4.3: x0 prediction every k steps
  sampling.interpolation_t = 500       # DDPM §4.4
  sampling.interpolation_num_lambdas = 11

  # --- evaluation ---
  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.metrics = ('bpd', 'rate_distortion')  # any of bpd, rate_distortion, fid, digits_fid
  evaluation.batch_size = 256
  evaluation.num_examples = 10_000        # test examples for bpd / rate-distortion
  evaluation.num_train_examples = 10_000  # train subset for the train-test NLL gap; 0 disables
  evaluation.fid_num_samples = 50_000
  evaluation.inception_weights = ml_collections.config_dict.placeholder(str)
  # FID Inception: 'flax' (the port, on the accelerator; compared with the TF graph the first time a
  # weights file is used) or 'tf_graph' (TF's frozen graph itself, on the CPU: the reference, slow).
  evaluation.inception_backend = 'flax'
  evaluation.inception_self_check = True  # False runs the Flax port unchecked (explicit opt-out)
  evaluation.precision_recall_k = 5       # k-NN of improved precision / recall (iDDPM); 0 disables
  evaluation.sample_dir = ml_collections.config_dict.placeholder(str)  # default: <workdir>/samples

  # --- how this machine runs it (changes no result's meaning; see ddpm_jax.runtime) ---
  config.runtime = runtime = ml_collections.ConfigDict()
  # CPU only: JAX devices the cores are split into (data parallel, one thread each). 0: one per core
  # (at most 8) as far as the batch sizes divide; 1: one multi-threaded device, JAX's own default.
  runtime.cpu_devices = 0
  # JAX's persistent compilation cache: None: ~/.cache/ddpm_jax/jax (or $XDG_CACHE_HOME/ddpm_jax/jax);
  # '': off. JAX_COMPILATION_CACHE_DIR, if set, wins.
  runtime.compilation_cache_dir = ml_collections.config_dict.placeholder(str)
  # How the train step sums the gradient over devices: 'flat' (one all-reduce of one buffer; needs
  # model.dropout=0), 'per_weight' (XLA's, one operand per weight, which XLA can overlap with the backward
  # pass on accelerators) or 'auto' ('flat' on a CPU with several devices and no dropout, else 'per_weight'):
  # ddpm_jax.parallel.GRADIENT_ALL_REDUCES.
  runtime.gradient_all_reduce = 'auto'
  # CPU only: whose convolution kernels the train step is compiled with: 'ynnpack' (XLA:CPU's default
  # library), 'xla' (XLA's own) or 'auto' ('xla' for images of 16 pixels or more, where they are faster:
  # ddpm_jax.parallel.CPU_CONVOLUTIONS, BENCHMARKS.md). Changes float32 rounding only.
  runtime.cpu_train_convolutions = 'auto'
  # CPU only: whose reduction kernels (GroupNorm's moments) the sampler is compiled with: 'xla' (XLA's
  # own, faster there) or 'ynnpack' (XLA:CPU's default library): ddpm_jax.parallel.CPU_REDUCTIONS,
  # BENCHMARKS.md. Changes float32 rounding only.
  runtime.cpu_sample_reductions = 'xla'
  return config
