"""Write the demo manifest: a dozen rows from the scenarios teams run with Qwen-Image.

Sizes are small because the demo renders with the tiny CPU model; with the real model, drop
width/height and use `aspect_ratio` (e.g. "16:9") instead.
Usage: python examples/make_demo_manifest.py OUT.parquet
"""

import sys

import pyarrow as pa
import pyarrow.parquet as pq

ROWS = [
    ("hk-guide-01", 'A bilingual travel-guide page about Hong Kong, headline "香港 Hong Kong", Victoria Harbour at night, neat two-column layout', "en", 128, 96),
    ("hk-guide-02", '一页双语旅游指南：标题“维多利亚港 Victoria Harbour”，夜景，版式清晰', "zh", 128, 96),
    ("beijing-guide-01", 'Travel guide page "故宫 · The Forbidden City", opening hours 8:30-17:00, map inset', "auto", 96, 128),
    ("hangzhou-guide-01", '旅游指南封面：“杭州西湖 West Lake”，春天，柳树，石桥', "auto", 96, 128),
    ("perfume-ad-01", 'Luxury perfume advertisement, bottle on black marble, slogan "Timeless Elegance", price "¥899"', "en", 128, 128),
    ("tea-ad-01", '高端茶叶广告海报，标语“一叶一世界”，价格“¥298”，水墨风格', "zh", 128, 128),
    ("sneaker-poster-01", 'Product poster for running shoes, big text "RUN FASTER", price "$129", dynamic lighting', "en", 96, 128),
    ("notice-01", '政府通知公文：标题“关于2027年春节放假安排的通知”，红头文件格式，正文段落整齐，落款与印章', "zh", 96, 128),
    ("menu-01", 'Restaurant menu board, title "Dim Sum 点心", items with prices, chalkboard style', "auto", 128, 96),
    ("event-poster-01", 'Jazz festival poster, title "Shanghai Jazz Night 上海爵士之夜", date "2027.05.20"', "auto", 96, 128),
    ("slide-01", 'Presentation slide titled "Q3 Results", three bullet points and a bar chart, clean corporate style', "en", 128, 96),
    ("book-cover-01", '书籍封面：书名“长安的荔枝”，作者 马伯庸，古风插画', "zh", 96, 128),
]


def main(out: str) -> None:
    table = pa.table(
        {
            "id": [r[0] for r in ROWS],
            "prompt": [r[1] for r in ROWS],
            "language": [r[2] for r in ROWS],
            "width": pa.array([r[3] for r in ROWS], pa.int64()),
            "height": pa.array([r[4] for r in ROWS], pa.int64()),
            "campaign": ["demo"] * len(ROWS),  # an unknown column: passed through to results.parquet
        }
    )
    pq.write_table(table, out)
    print(f"wrote {out}: {len(ROWS)} rows")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples/demo.parquet")
