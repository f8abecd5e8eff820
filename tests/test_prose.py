from lqlib.book.prose import listing, plural


def test_plural_and_listing():
    assert plural(1, "window") == "1 window" and plural(2, "window") == "2 windows" and plural(0, "token") == "0 tokens"
    assert plural(1500, "token") == "1,500 tokens" and plural(2, "matrix", "matrices") == "2 matrices"
    assert listing([]) == "" and listing(["a"]) == "a" and listing(["a", "b"]) == "a and b"
    assert listing(["a", "b", "c"], "or") == "a, b or c"
