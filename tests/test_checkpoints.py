"""The content-addressed checkpoint store: digests, atomic writes, corruption detection."""
import pytest
import torch

from rumflow.artifacts.checkpoints import CheckpointStore, state_digest
from rumflow.errors import CheckpointError
from rumflow.models import ModelSpec, create_model

SPEC = ModelSpec("small_cnn", 10, 1, (0.3,), (0.4,))


def test_save_load_round_trip(tmp_path):
    store = CheckpointStore(tmp_path)
    model = create_model(SPEC, seed=0)
    ref = store.save(model)
    assert store.path(ref) == tmp_path / f"{ref.sha256}.pt" and store.intact(ref)
    assert "path" not in ref.model_dump()  # references are relative: a run folder can move
    assert store.save(create_model(SPEC, seed=0)) == ref  # same weights, same file
    assert store.save(create_model(SPEC, seed=1)).sha256 != ref.sha256
    other = store.load_into(ref, create_model(SPEC, seed=1))
    assert state_digest(other.state_dict()) == ref.sha256
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_checkpoint_is_reported_not_loaded(tmp_path, damage):
    store = CheckpointStore(tmp_path)
    ref = store.save(create_model(SPEC, seed=0))
    path = store.path(ref)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # same size, different weights: only the digest can tell
        state = torch.load(path, weights_only=True)
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key] = state[key] + 1
        torch.save(state, path)
    else:
        path.unlink()
    assert not store.intact(ref)
    with pytest.raises(CheckpointError, match="re-run the same command"):
        store.load_state(ref)


def test_non_finite_weights_are_never_saved(tmp_path):
    model = create_model(SPEC, seed=0)
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    with pytest.raises(CheckpointError, match="diverged"):
        CheckpointStore(tmp_path).save(model)
    assert not list(tmp_path.glob("*"))


def test_a_flipped_byte_of_the_same_size_is_not_intact(tmp_path):
    store = CheckpointStore(tmp_path)
    ref = store.save(create_model(SPEC, seed=0))
    path = store.path(ref)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert path.stat().st_size == ref.size and not store.intact(ref)
