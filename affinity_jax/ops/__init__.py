"""Pure, jittable operations of AffinityNet."""
