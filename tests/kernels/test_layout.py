"""kernels/layout.py: the run-by-run strided copy equals torch's copy exactly, for the packs and
unpacks of DAP's collectives and for layouts it must leave to torch."""
import pytest
import torch

from fastfold_plugin.kernels import layout


def _views(p, r, n, c, dtype, seed):
    """The views an axis switch copies: the row->column pack [P, R, N/P, C] of a row shard, the
    column->row unpack of a received [P, R, R, C], and both with a leading batch dim."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(r, n, c, generator=g).to(dtype)
    recv = torch.randn(p, r, r, c, generator=g).to(dtype)
    batched = torch.randn(2, r, n, c, generator=g).to(dtype)
    return {
        "pack": rows.unflatten(1, (p, -1)).movedim(1, 0),
        "unpack": recv.movedim(0, 1),
        "batched pack": batched.unflatten(2, (p, -1)).movedim(2, 0),
        "transposed inner": rows.transpose(0, 1),  # runs of C only
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_copy_matches_torch(dtype, monkeypatch):
    monkeypatch.setattr(layout, "_BLOCK", 64)  # several programs per run at tiny sizes
    monkeypatch.setattr(layout, "_MIN_RUN", 8)
    for name, v in _views(2, 3, 10, 8, dtype, seed=0).items():
        assert not v.is_contiguous(), name
        got = layout.contiguous(v)
        assert got.is_contiguous() and torch.equal(got, v.contiguous()), name
        out = torch.full(v.shape, float("nan"), dtype=dtype)
        assert layout.copy_(out, v) is out and torch.equal(out, v), name
        # into a strided destination: the unpack writes a permuted view of a buffer
        buf = torch.full(v.movedim(0, -2).shape, float("nan"), dtype=dtype)
        dst = buf.movedim(-2, 0)
        layout.copy_(dst, v)
        assert torch.equal(dst, v), name


@pytest.fixture
def launched(monkeypatch):
    """The grids of the run kernel's launches, in order."""
    grids = []
    real = layout._copy_runs_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(layout, "_copy_runs_kernel", Spy())
    return grids


def test_launches_only_where_it_pays(launched, monkeypatch):
    """Short runs, more than three outer dims, a shared storage and mixed dtypes go to torch;
    the pack of a switch goes to the kernel."""
    monkeypatch.setattr(layout, "_MIN_RUN", 16)
    x = torch.randn(4, 6, 40)
    pack = x.unflatten(1, (2, -1)).movedim(1, 0)  # runs of 3 * 40 elements
    layout.contiguous(pack)
    assert len(launched) == 1
    short = torch.randn(4, 6, 2).transpose(0, 1)  # runs of 2
    assert torch.equal(layout.contiguous(short), short.contiguous())
    five = torch.randn(2, 2, 2, 2, 2, 40).transpose(0, 1).transpose(2, 3)  # 4 outer dims
    assert torch.equal(layout.contiguous(five), five.contiguous())
    same = torch.randn(2, 64)
    layout.copy_(same[:1], same[1:])  # shares storage with its source
    assert torch.equal(same[0], same[1])
    mixed = torch.empty(pack.shape, dtype=torch.float64)
    assert torch.equal(layout.copy_(mixed, pack), pack.double())
    assert len(launched) == 1
    c = torch.randn(3, 4)
    assert layout.contiguous(c) is c
    with pytest.raises(ValueError):
        layout.copy_(torch.empty(2, 3), torch.empty(3, 2))


@pytest.mark.parametrize("dst_dtype,src_dtype", [(torch.float32, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float32)])
def test_add_matches_torch(dst_dtype, src_dtype, monkeypatch):
    """``add_`` equals torch's in-place add bit for bit (sum in fp32, rounded to dst's dtype),
    into strided and contiguous destinations, long runs in several blocks and short ones several
    to a program."""
    monkeypatch.setattr(layout, "_BLOCK", 32)  # runs of 40: two blocks; runs of 8: 4 a program
    monkeypatch.setattr(layout, "_MIN_RUN", 8)
    for name, v in _views(2, 3, 10, 8, src_dtype, seed=1).items():
        g = torch.Generator().manual_seed(2)
        base = (torch.randn(v.shape, generator=g) * 100).to(dst_dtype)
        want = base.clone().add_(v)
        got = base.clone()
        assert layout.add_(got, v) is got and torch.equal(got, want), name
        # a strided destination (the update added into a transposed residual)
        buf = base.movedim(0, -2).clone()
        dst = buf.movedim(-2, 0)
        layout.add_(dst, v)
        assert torch.equal(dst, want), name
    with pytest.raises(ValueError):
        layout.add_(torch.empty(2, 3), torch.empty(3, 2))


def test_short_runs_several_to_a_program(launched, monkeypatch):
    """Runs shorter than a program's block are copied several to a program: one launch whose
    grid covers every row once (104 runs of 8 elements, 4 runs per program)."""
    monkeypatch.setattr(layout, "_BLOCK", 32)
    monkeypatch.setattr(layout, "_MIN_RUN", 8)
    x = torch.randn(13, 8, 8).transpose(0, 1)  # 104 runs of 8 elements
    got = layout.contiguous(x)
    assert torch.equal(got, x.contiguous())
    assert launched == [(26, 1)]  # 104 rows / 4 per program, one block per run


def test_repeating_destination_left_to_torch(monkeypatch):
    """A destination whose elements repeat (an expanded view) is never written by the kernel
    (its programs would race): torch's op refuses it, as it refuses it without the plugin."""
    monkeypatch.setattr(layout, "_MIN_RUN", 8)
    d = torch.zeros(1, 16)
    src = torch.randn(4, 32)[:, :16]
    with pytest.raises(RuntimeError):
        layout.add_(d.expand(4, 16), src)
    with pytest.raises(RuntimeError):
        layout.copy_(d.expand(4, 16), src)
