"""The training loop: seeded reproducibility, batching, augmentation and the recorded learning events."""
import pytest
import torch

from rumflow.artifacts.checkpoints import state_digest
from rumflow.data import load_dataset
from rumflow.errors import DivergenceError
from rumflow.models import ModelSpec, create_model
from rumflow.training import Recipe, accuracy, augment_batch, minibatches, train_model


@pytest.fixture(scope="module")
def small():
    ds = load_dataset("digits")
    return ds.train.take(ds.train.ids()[:150]), ModelSpec("small_cnn", 10, 1, ds.mean, ds.std)


def test_same_seed_same_weights_and_events(small):
    split, spec = small
    runs = []
    for _ in range(2):
        model = create_model(spec, seed=3)
        result = train_model(model, split, Recipe(2, 0.05, 32), seed=3, record_events=True)
        runs.append((state_digest(model.state_dict()), result.events))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])
    other = create_model(spec, seed=3)
    train_model(other, split, Recipe(2, 0.05, 32), seed=4)
    assert state_digest(other.state_dict()) != runs[0][0]


def test_events_are_per_example_means_in_range(small):
    split, spec = small
    events = train_model(create_model(spec, seed=0), split, Recipe(3, 0.05, 32), seed=0, record_events=True).events
    assert events.shape == (len(split), 4)
    conf, maxp, neg_entropy, acc = events.T
    assert ((conf >= 0) & (conf <= maxp + 1e-6) & (maxp <= 1)).all()
    assert (neg_entropy <= 1e-6).all() and (neg_entropy >= -torch.log(torch.tensor(10.0)) - 1e-5).all()
    assert torch.isin(acc * 3, torch.arange(4.0)).all()  # a mean of three 0/1 values


def test_minibatches_cover_everything_without_a_batch_of_one():
    gen = torch.Generator().manual_seed(0)
    batches = list(minibatches(257, 128, gen, torch.device("cpu")))
    assert sorted(torch.cat(batches).tolist()) == list(range(257))
    assert min(len(b) for b in batches) >= 2


def test_augmentation_is_a_padded_crop_or_its_mirror():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32) + 1
    out = augment_batch(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):
        windows = [padded[i, :, a:a + 32, b:b + 32] for a in range(9) for b in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)


def test_divergence_stops_training(small):
    split, spec = small
    with pytest.raises(DivergenceError, match="diverged"):
        train_model(create_model(spec, seed=0), split, Recipe(3, 1e6, 32), seed=0)


def test_lenet_bn_learns_digits_in_a_few_epochs():
    # the MNIST model (configs/mnist.yaml) also takes 8x8 digits: its pool brings any size to 3x3
    ds = load_dataset("digits")
    model = create_model(ModelSpec("lenet_bn", 10, 1, ds.mean, ds.std), seed=0)
    train_model(model, ds.train, Recipe(5, 0.1, 64), seed=0)
    assert accuracy(model, ds.test) > 0.9
