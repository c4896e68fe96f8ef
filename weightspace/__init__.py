"""Weight-space analysis: fine-tuning recipes, updates, projections and overlaps."""
