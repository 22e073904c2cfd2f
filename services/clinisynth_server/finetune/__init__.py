"""The finetune service."""
