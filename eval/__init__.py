"""Evaluation: DreamBooth benchmark prompts, DINO / CLIP / LPIPS / edge metrics and the folder scorer."""
