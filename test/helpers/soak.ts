/**
 * How hard the fault suite pushes. `npm test` runs the fast level (a few cycles,
 * seconds per case); `npm run soak` sets SOAK=full (≥ 20 cycles, SOAK_CYCLES
 * raises it, e.g. SOAK_CYCLES=100). Every case stays bounded in count and time.
 */
export const FULL = process.env.SOAK === 'full';

/** Cycles of a fault loop at this level. */
export function cycles(fast: number, full = 20): number {
  const asked = Number(process.env.SOAK_CYCLES);
  if (FULL && Number.isInteger(asked) && asked > 0) return Math.min(asked, 1000);
  return FULL ? full : fast;
}

/** A pseudo-random generator with a printed seed, so a failing run can be replayed (SOAK_SEED=N). */
export function seeded(): { seed: number; next: () => number } {
  const seed = Number(process.env.SOAK_SEED) || (Date.now() % 2 ** 31);
  let s = seed;
  return {
    seed,
    next: () => {
      s = (s * 1103515245 + 12345) % 2 ** 31;
      return s / 2 ** 31;
    },
  };
}
