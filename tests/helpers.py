"""Small helpers shared by tests (import as `from helpers import ...`)."""


def tiny_rows(count, *, prefix="row", size=32, **extra):
    """`count` small valid rows for the tiny model (32x32, 2 steps)."""
    prompts = ["a red poster", "香港 旅游 指南", "a bottle of perfume", "官方通知 标题", "menu 菜单"]
    return [
        {"id": f"{prefix}-{n:03d}", "prompt": prompts[n % len(prompts)] + f" #{n}", "width": size, "height": size,
         "steps": 2, **extra}
        for n in range(count)
    ]
