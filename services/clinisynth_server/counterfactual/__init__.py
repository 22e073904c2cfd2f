"""The counterfactual service."""
