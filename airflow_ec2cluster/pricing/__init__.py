"""Prices: the on-demand table (``table.py``), its refresh from the AWS Price List API (``price_list.py``),
and spot prices from DescribeSpotPriceHistory (``spot.py``)."""
