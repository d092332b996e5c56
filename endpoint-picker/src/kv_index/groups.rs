//! Which KV-cache groups of an engine feed the index.
//!
//! A hybrid model (sliding-window or Mamba layers beside full attention: gpt-oss, Gemma 3)
//! keeps one cache per group of layers, and vLLM announces each group's blocks apart, under the
//! same block hashes, with `group_idx` (and `kv_cache_spec_kind` in its stores). A prompt finds
//! its prefix cached only where the full-attention blocks are: a sliding window's evictions say
//! nothing about them. So, as llm-d's indexer does, the index takes the stores of the groups
//! that keep every token of a prefix ([`kv_events::CacheKind::keeps_prefixes`]) and of
//! engines that name no group, and the removals of those groups only. A store naming a group without its kind (a
//! vLLM release sent `group_idx` before `kv_cache_spec_kind`) is taken for group 0 only: a model
//! with one cache has only that group (llm-d's indexer drops them all, and with them every
//! store of such an engine). A removal's group has no kind on the wire: it is known from the
//! stores seen before on the same stream.

use kv_events::Event;

/// What a stream's stores said about its groups: which of the first 64 keep prefixes.
/// Group numbers past 63 (no model has a tenth of that) are not tracked: their stores and
/// removals are left out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheGroups {
    keeps_prefixes: u64,
}

impl CacheGroups {
    /// Leaves out of `events` those about groups the index does not read, learning the groups'
    /// kinds from the stores as it goes (in order: a store teaches the removals after it).
    /// How many events were left out.
    pub fn retain_prefix_groups(&mut self, events: &mut Vec<Event>) -> u64 {
        let before = events.len();
        events.retain(|event| match event {
            Event::BlockStored(stored) => match stored.group {
                None => true,
                Some(group) => {
                    // Without its kind (vLLM sent `group_idx` a release before the kind), the
                    // first group is taken for the one that keeps prefixes: a model with one
                    // cache has only it, and so every model vLLM then published groups for.
                    let keeps = match group.kind {
                        Some(kind) => kind.keeps_prefixes(),
                        None => group.index == 0,
                    };
                    if let Some(bit) = Self::bit(group.index)
                        && (group.kind.is_some() || keeps)
                    {
                        if keeps {
                            self.keeps_prefixes |= bit;
                        } else {
                            self.keeps_prefixes &= !bit;
                        }
                    }
                    // A group whose removals cannot be followed is not read either.
                    keeps && Self::bit(group.index).is_some()
                }
            },
            Event::BlockRemoved(removed) => match removed.group_idx {
                None => true,
                Some(index) => Self::bit(index).is_some_and(|bit| self.keeps_prefixes & bit != 0),
            },
            Event::AllBlocksCleared => true,
        });
        (before - events.len()) as u64
    }

    fn bit(index: i64) -> Option<u64> {
        u32::try_from(index).ok().and_then(|i| 1u64.checked_shl(i))
    }
}

#[cfg(test)]
mod tests {
    use kv_events::{BlockRemoved, BlockStored, CacheGroup, CacheKind, Medium};

    use super::*;

    fn stored(hash: u64, group: Option<(i64, Option<CacheKind>)>) -> Event {
        Event::BlockStored(BlockStored {
            block_hashes: vec![hash],
            parent_block_hash: None,
            token_ids: vec![1, 2],
            block_size: 2,
            lora_id: None,
            lora_name: None,
            medium: Medium::Gpu,
            group: group.map(|(index, kind)| CacheGroup { index, kind }),
        })
    }

    fn removed(hash: u64, group_idx: Option<i64>) -> Event {
        Event::BlockRemoved(BlockRemoved {
            block_hashes: vec![hash],
            medium: Medium::Gpu,
            group_idx,
        })
    }

    /// An engine that sends `group_idx` without its kind: group 0 is read, stores and
    /// removals, as the one cache of a model that has one.
    #[test]
    fn the_first_group_without_a_kind_is_read() {
        let mut groups = CacheGroups::default();
        let mut events = vec![stored(1, Some((0, None))), removed(1, Some(0))];
        assert_eq!(groups.retain_prefix_groups(&mut events), 0);
        assert_eq!(events.len(), 2);
    }

    /// A hybrid model's batch: the full-attention group's stores and removals are kept, the
    /// sliding window's left out; events naming no group are kept as they always were.
    #[test]
    fn only_the_groups_that_keep_prefixes_are_read() {
        let mut groups = CacheGroups::default();
        let mut events = vec![
            stored(1, Some((0, Some(CacheKind::FullAttention)))),
            stored(1, Some((1, Some(CacheKind::SlidingWindow)))),
            removed(1, Some(1)),
            stored(2, None),
            removed(2, None),
            Event::AllBlocksCleared,
        ];
        assert_eq!(groups.retain_prefix_groups(&mut events), 2);
        assert_eq!(
            events,
            vec![
                stored(1, Some((0, Some(CacheKind::FullAttention)))),
                stored(2, None),
                removed(2, None),
                Event::AllBlocksCleared,
            ]
        );
        // A later batch: the full-attention group's removal is read, its kind known from
        // before; MLA and sink groups keep prefixes too.
        let mut events = vec![
            removed(1, Some(0)),
            stored(3, Some((2, Some(CacheKind::MlaAttention)))),
            stored(4, Some((3, Some(CacheKind::SinkFullAttention)))),
            removed(3, Some(2)),
        ];
        assert_eq!(groups.retain_prefix_groups(&mut events), 0);
    }

    /// A group other than the first without a kind, an unknown kind, a negative or far group,
    /// and a removal of a group never seen stored are all left out.
    #[test]
    fn groups_that_cannot_be_told_are_left_out() {
        let mut groups = CacheGroups::default();
        let mut events = vec![
            stored(1, Some((1, None))),
            stored(1, Some((4, Some(CacheKind::Other)))),
            stored(1, Some((-1, Some(CacheKind::FullAttention)))),
            removed(1, Some(0)),
            removed(1, Some(1)),
            removed(1, Some(4)),
            removed(1, Some(-1)),
            removed(1, Some(64)),
            removed(1, Some(i64::MAX)),
        ];
        assert_eq!(groups.retain_prefix_groups(&mut events), 9);
        assert!(events.is_empty());
        // Past 63 neither stores nor removals are read: removals could not be followed.
        let mut events = vec![
            stored(1, Some((70, Some(CacheKind::FullAttention)))),
            removed(1, Some(70)),
        ];
        assert_eq!(groups.retain_prefix_groups(&mut events), 2);
    }
}
