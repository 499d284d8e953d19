"""Downloads and prepares a tfds dataset once, e.g. on a machine with network access.

  python -m ddpm_jax.data.prepare cifar10 --data_dir=/data/tfds
  python -m ddpm_jax.data.prepare celeb_a_hq/256 --data_dir=/data/tfds --manual_dir=/data/celeba_hq

Then train with --config.data.data_dir=/data/tfds. This is what the DatasetUnavailableError of an
unprepared dataset advises. It stands in for `tfds build`, whose CLI (tfds 4.9.10) imports
apache_beam at start-up, a package that tensorflow-datasets does not install.
"""

from __future__ import annotations

import argparse
import sys

from ddpm_jax.data import tfds_source


def main(argv: list[str] | None = None) -> int:
  """Prepares the dataset named in argv; returns the exit status (1: it could not be prepared)."""
  parser = argparse.ArgumentParser(prog='python -m ddpm_jax.data.prepare', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('dataset', help="tfds name, e.g. cifar10, mnist, celeb_a_hq/256, "
                      "lsun/church_outdoor (what config.data.dataset says)")
  parser.add_argument('--data_dir', default=None,
                      help='tfds data_dir to prepare it in (default: ~/tensorflow_datasets '
                      'or $TFDS_DATA_DIR)')
  parser.add_argument('--manual_dir', default=None,
                      help='where the manually downloaded files are (default: '
                      '<data_dir>/downloads/manual)')
  args = parser.parse_args(argv)
  try:
    builder = tfds_source.prepared_builder(args.dataset, args.data_dir, args.manual_dir)
  except (ValueError, tfds_source.DatasetUnavailableError) as e:
    print(e, file=sys.stderr)
    return 1
  splits = ', '.join(f'{name}: {split.num_examples}' for name, split in builder.info.splits.items())
  print(f'{args.dataset} is prepared in {builder.data_dir} ({splits}); train with '
        f'--config.data.data_dir={builder.data_dir_root}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
