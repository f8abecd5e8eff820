from lqlib.book.prose import listing, plural, windows_text


def test_plural_and_listing():
    assert plural(1, "window") == "1 window" and plural(2, "window") == "2 windows" and plural(0, "token") == "0 tokens"
    assert plural(1500, "token") == "1,500 tokens" and plural(2, "matrix", "matrices") == "2 matrices"
    assert listing([]) == "" and listing(["a"]) == "a" and listing(["a", "b"]) == "a and b"
    assert listing(["a", "b", "c"], "or") == "a, b or c"


def test_windows_text_agrees_in_number():
    assert windows_text(1, 512) == "1 window of 512 tokens"
    assert windows_text(24, 2048) == "24 windows of 2,048 tokens"
