"""The prefix-cache hit rate that placement alone can reach on `kv-sharing` (bench/RESULTS.md,
"What placement can still win on `kv-sharing`").

A model of the simulator's tiers (`sim/src/tiers.rs`), without time: per replica a CPU tier
that every block computed or loaded is written through to, and that a request's lookup
refreshes (first block last); one store shared by every replica, written the same way. The GPU
tier is a subset of the CPU tier there, so it adds no hits, only cheaper ones, and is left out.
Requests pick one of the groups uniformly, as the workload does, and each request's question
and answer add blocks no other request has. A placement maps each group to one replica for
good: `hashed` as a hash does (and as a router that never moves a group ends up), `even` with
the same number of groups on every replica (the best a fixed placement can do for equally
popular groups). Hit: the prompt's blocks found in a tier, over all its blocks.

    python3 bench/analysis/lru_ceiling.py [requests] [seeds]
"""

import collections
import random
import sys

REPLICAS = 8
CPU_BLOCKS = 16384  # --cpu-kv-blocks of the goodput preset
SHARED_BLOCKS = 65536  # --shared-kv-blocks
GROUPS = 262  # the kv-sharing table's groups
PREFIX_BLOCKS = 500  # 2,721 workload tokens x 2.94 engine tokens each / 16
QUESTION_BLOCKS = 25  # the 136-token question: 400 engine tokens
ANSWER_BLOCKS = 4  # 64 output tokens


class Lru:
    def __init__(self, capacity):
        self.capacity = capacity
        self.blocks = collections.OrderedDict()

    def __contains__(self, block):
        return block in self.blocks

    def touch(self, block):
        if block in self.blocks:
            self.blocks.move_to_end(block)
        else:
            self.blocks[block] = None
            if len(self.blocks) > self.capacity:
                self.blocks.popitem(last=False)


def hit_rate(placement, requests, seed):
    rnd = random.Random(seed)
    cpu = [Lru(CPU_BLOCKS) for _ in range(REPLICAS)]
    shared = Lru(SHARED_BLOCKS)
    hit = total = 0
    unique = 0
    for i in range(requests):
        group = rnd.randrange(GROUPS)
        tier = cpu[placement[group]]
        prefix = [(group, b) for b in range(PREFIX_BLOCKS)]
        found = 0
        while found < PREFIX_BLOCKS and prefix[found] in tier:
            found += 1
        from_cpu = found
        while found < PREFIX_BLOCKS and prefix[found] in shared:
            found += 1
        if i >= requests // 4:  # after the warm-up
            hit += found
            total += PREFIX_BLOCKS + QUESTION_BLOCKS
        # The lookup refreshes what the CPU tier holds, first block last; what was loaded
        # from the store or computed is written to both tiers.
        for block in reversed(prefix[:from_cpu]):
            tier.touch(block)
        for block in prefix[from_cpu:]:
            tier.touch(block)
            shared.touch(block)
        for _ in range(QUESTION_BLOCKS + ANSWER_BLOCKS):
            unique += 1
            tier.touch(("unique", unique))
            shared.touch(("unique", unique))
    return hit / total


def main():
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 40000
    seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    even = [g % REPLICAS for g in range(GROUPS)]
    for seed in range(seeds):
        rnd = random.Random(1000 + seed)
        hashed = [rnd.randrange(REPLICAS) for _ in range(GROUPS)]
        per_replica = sorted(collections.Counter(hashed).values())
        print(
            f"seed {seed}: hashed {hit_rate(hashed, requests, seed):.3f} "
            f"(groups per replica {per_replica}), even {hit_rate(even, requests, seed):.3f}"
        )


if __name__ == "__main__":
    main()
