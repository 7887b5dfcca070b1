"""Generation and visual prompting: example pairs + a query image in, the answer image out."""
