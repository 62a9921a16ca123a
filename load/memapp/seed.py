"""Fill the SQLite database once, with fixed data (the same on every run)."""

import datetime as dt
from decimal import Decimal

from django.core.management import call_command
from django.db import transaction

from load.memapp.models import Author, Book, Publisher, Review, Tag

AUTHORS = 40
BOOKS = 400
TAGS = 30


def seed() -> None:
    call_command("migrate", run_syncdb=True, verbosity=0)
    if Book.objects.exists():
        return
    with transaction.atomic():
        publishers = [Publisher.objects.create(name=f"Press {i}", city=f"City {i % 7}")
                      for i in range(8)]
        authors = [Author.objects.create(name=f"Author {i}", slug=f"author-{i}",
                                         born=dt.date(1900 + i, 1 + i % 12, 1 + i % 28))
                   for i in range(AUTHORS)]
        tags = [Tag.objects.create(slug=f"tag-{i}") for i in range(TAGS)]
        for i in range(BOOKS):
            book = Book.objects.create(
                title=f"Book {i:04d}", author=authors[i % AUTHORS],
                publisher=publishers[i % len(publishers)], pages=100 + i,
                price=Decimal(f"{5 + i % 40}.99"), published=dt.date(1950 + i % 70, 1, 1))
            book.tags.set(tags[i % TAGS:i % TAGS + 3])
            Review.objects.create(book=book, stars=1 + i % 5, text="Readable. " * (i % 9 + 1))
