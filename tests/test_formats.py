"""How values are written in tables (invbench.formats)."""
from invbench.formats import cell, column


def test_cell_writes_a_number_by_its_spec_and_none_as_a_dash():
    assert cell(0.12345) == "0.123" and cell(None) == "-" and cell(True) == "True" and cell("leaks") == "leaks"


def test_a_huge_number_keeps_its_column_narrow():
    assert column(0.5) == "0.5000" and column(-0.0131, "+.4f") == "-0.0131"
    assert column(2.4196207103366747e41) == "2.420e+41"  # a perplexity ratio under sigma 10: was 46 characters
    assert column(3.5e46, "+.4f") == "+3.500e+46" and column(999999.0) == "999999.0000"
    assert column(None) == "-" and column("leaks") == "leaks"
