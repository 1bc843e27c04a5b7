"""The Tina web demo (Gradio): `tina demo` or `python -m serve`; the page is built in serve/app.py."""
