"""The sharding plan: which records and which test batches a rank takes.

Training, exact: N ranks of batch B read, in one global step, the records one process with
batch N·B would read, in the same order; rank r takes the r-th contiguous B-slice. A data
layer's batch b on rank r is therefore its batch ``b·N + r`` counted in B-batches, which the
layer works out itself from the (rank, size) handed to it by ``set_shard`` (layers never see
a communicator). So N ranks x B equal one process x B with ``iter_size: N`` too.

Testing: the test_iter batches of one test are split into contiguous runs, one per rank;
every rank goes through the same number of rounds (a rank with fewer batches idles in its last
round) so that polling the signal flags, a collective, stays in step.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``size``."""

    rank: int = 0
    size: int = 1

    def test_batches(self, count: int) -> range:
        """This rank's contiguous run of a test's ``count`` batches."""
        return range(count * self.rank // self.size, count * (self.rank + 1) // self.size)

    def test_rounds(self, count: int) -> int:
        """The most batches any rank runs in one test (rounds every rank goes through)."""
        return -(-count // self.size)


def shard_data_layers(net, shard: Shard) -> int:
    """Hand ``shard`` to every data layer of ``net`` that takes one (``set_shard``); returns
    how many did. Layers without it (Input, DummyData, Python layers) are left alone."""
    count = 0
    for layer in net.layers:
        if callable(getattr(type(layer), "set_shard", None)):
            layer.set_shard(shard.rank, shard.size)
            count += 1
    return count
