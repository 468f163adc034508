"""Serving: model_bento, the license_policy check and the on-demand merged_model export."""
