"""Class heatmaps from Python. Run from anywhere: ``python samples/example.py``; writes into ./heatmaps/."""
from pathlib import Path

import convify

here = Path(__file__).resolve().parent
result = convify.heatmap(here / "cat_and_coffee.jpg")  # the default model: EfficientNet-Lite0, offline

print(f"{result.image.width}x{result.image.height} px image, run at {result.input_size[0]}x{result.input_size[1]}:"
      f" a {result.logits.shape[1]}x{result.logits.shape[2]} map of {result.logits.shape[0]} classes,"
      f" one cell every {result.geometry.stride} px of the network's input ({result.geometry.stride * result.scale[0]:.1f}"
      " px of the photo)")
for p in result.top(3):
    box = ", ".join(f"{v:.0f}" for v in p.box)
    print(f"  {p.name:<14} probability {p.score:.2f} at cell {p.cell}, window ({box}) in the photo's pixels")

# every class's map came from the same forward pass: asking for another costs nothing
cup = result.prediction("cup")
print(f"  {cup.name:<14} probability {cup.score:.2f} at cell {cup.cell}")

written = result.save("heatmaps", queries=["espresso", "tabby"], formats=("png", "json"), force=True)
print("wrote", ", ".join(str(p) for p in written))
