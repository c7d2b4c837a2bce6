"""A Fashion-MNIST classifier whose penultimate features give FD-FMNIST, the Fréchet
distance of samples to the test set on this data (Inception's features know nothing of
32×32 grey clothes; FD-FMNIST is not FID and is never reported as one).

    python -m secant_jax.evaluation.fmnist_features --out ckpt/fmnist-features

trains it on the 60k training images (Adam, a few epochs), prints the test accuracy after
each epoch, and writes the variables with Orbax plus accuracy.json beside them. Its
features are fed to the same statistics and Fréchet-distance code as FID
(evaluation.features.FeatureNetwork).
"""

import argparse
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from secant_jax import arguments
from secant_jax import files
from secant_jax.convert import common
from secant_jax.data import fashion_mnist
from secant_jax.evaluation import features

FEATURE_DIM = 256


class Classifier(nn.Module):
  """Two 3×3 conv pairs with max pooling, then a 256-wide ReLU layer (the features) and the
  10-way linear head. Input: uint8 [B, 32, 32, 1]."""

  @nn.compact
  def __call__(self, images):
    x = images.astype(jnp.float32) / 127.5 - 1.0
    for width in (32, 64):
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Dense(FEATURE_DIM, name='features')(x.reshape(x.shape[0], -1)))
    return x, nn.Dense(10, name='head')(x)


def _apply(variables, images):
  return {'features': Classifier().apply(variables, images)[0]}


def feature_network(path):
  """The trained classifier as a FeatureNetwork ('fd_fmnist')."""
  if not path:
    raise ValueError('FD-FMNIST needs the Fashion-MNIST classifier: train it with `python -m '
                     'secant_jax.evaluation.fmnist_features --out DIR` and set '
                     'config.fid.fmnist to DIR.')
  if not epath.Path(path).is_dir():
    raise FileNotFoundError(f'Fashion-MNIST classifier {path} does not exist; train it with '
                            f'`python -m secant_jax.evaluation.fmnist_features --out {path}`.')
  return features.FeatureNetwork('fd_fmnist', FEATURE_DIM, _apply, common.load_variables(path))


@jax.jit
def _predict(variables, images):
  return jnp.argmax(Classifier().apply(variables, images)[1], -1)


def accuracy(variables, images, labels, batch_size=1000):
  correct = sum(int(np.sum(np.asarray(_predict(variables, images[i:i + batch_size]))
                           == labels[i:i + batch_size]))
                for i in range(0, len(labels), batch_size))
  return correct / len(labels)


def train(train_data, test_data, *, steps, batch_size=128, learning_rate=1e-3, seed=0,
          log=print):
  """Trains on (images uint8, labels) for `steps` Adam steps (cosine decay), with
  random horizontal flips; returns (variables, [test accuracy at each evaluation])."""
  images, labels = train_data
  key = jax.random.key(seed)
  variables = Classifier().init(key, images[:1])
  optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
  opt_state = optimizer.init(variables)

  @jax.jit
  def step(variables, opt_state, x, y):
    def loss_fn(v):
      logits = Classifier().apply(v, x)[1]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(variables)
    updates, opt_state = optimizer.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  steps_per_epoch = len(labels) // batch_size
  accuracies, order = [], None
  for i in range(steps):
    if i % steps_per_epoch == 0:
      order = rng.permutation(len(labels))
    index = order[(i % steps_per_epoch) * batch_size:][:batch_size]
    x = images[index]
    flip = rng.random(batch_size) < 0.5
    x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
    variables, opt_state, loss = step(variables, opt_state, x, labels[index])
    if (i + 1) % steps_per_epoch == 0 or i + 1 == steps:
      accuracies.append(accuracy(variables, *test_data))
      log(f'step {i + 1}/{steps}: loss {float(loss):.4f}, test accuracy {accuracies[-1]:.4f}')
  return variables, accuracies


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data_dir', default=fashion_mnist.DEFAULT_DIR)
  parser.add_argument('--out', required=True, help='Orbax checkpoint directory to write')
  parser.add_argument('--epochs', type=arguments.positive_int, default=8)
  parser.add_argument('--batch_size', type=arguments.positive_int, default=128)
  parser.add_argument('--learning_rate', type=float, default=1e-3)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  train_data = fashion_mnist.load(args.data_dir, 'train')
  test_data = fashion_mnist.load(args.data_dir, 'test')
  steps = args.epochs * (len(train_data[1]) // args.batch_size)
  variables, accuracies = train(train_data, test_data, steps=steps,
                                batch_size=args.batch_size,
                                learning_rate=args.learning_rate, seed=args.seed)
  common.save(jax.tree_util.tree_map(np.asarray, variables), args.out, overwrite=True)
  files.write_json(os.path.join(args.out, 'accuracy.json'),
                   {'test_accuracy': accuracies[-1], 'steps': steps})
  print(f'Fashion-MNIST classifier: test accuracy {accuracies[-1]:.4f} → {args.out}')


if __name__ == '__main__':
  main()
