
apileaderboard:weekly*úˆ'