"""Model fit and score, threshold policy, explanation, artefact store."""
