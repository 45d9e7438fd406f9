"""Layer 1: the label taxonomy (modality, anatomy) and the caption rules that find labels in free text."""
