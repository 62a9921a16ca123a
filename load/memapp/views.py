"""Views that render templates over ORM queries; each answer names the worker that made it."""

import os

from django.db.models import Avg, Count
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render
from django.urls import reverse

from load.memapp.models import Author, Book, Tag

PER_PAGE = 25


def _answer(request: HttpRequest, template: str, context: dict) -> HttpResponse:
    response = render(request, template, context)
    # The benchmark counts how many workers served its warm-up.
    response["X-Worker-Pid"] = str(os.getpid())
    return response


def book_list(request: HttpRequest) -> HttpResponse:
    page = int(request.GET.get("page", "1") or 1)
    books = (Book.objects.select_related("author", "publisher").prefetch_related("tags")
             [(page - 1) * PER_PAGE:page * PER_PAGE])
    return _answer(request, "memapp/book_list.html",
                   {"books": books, "page": page, "next": reverse("memapp:books") +
                    f"?page={page + 1}"})


def book_detail(request: HttpRequest, pk: int) -> HttpResponse:
    book = get_object_or_404(Book.objects.select_related("author", "publisher"), pk=pk)
    stats = book.reviews.aggregate(mean=Avg("stars"), count=Count("id"))
    return _answer(request, "memapp/book_detail.html",
                   {"book": book, "stats": stats, "reviews": book.reviews.all()})


def author_list(request: HttpRequest) -> HttpResponse:
    authors = Author.objects.annotate(count=Count("books")).order_by("name")
    return _answer(request, "memapp/author_list.html", {"authors": authors})


def author_detail(request: HttpRequest, slug: str) -> HttpResponse:
    author = get_object_or_404(Author, slug=slug)
    return _answer(request, "memapp/book_list.html",
                   {"books": author.books.select_related("publisher")[:PER_PAGE], "page": 1,
                    "heading": author.name})


def tag_detail(request: HttpRequest, slug: str) -> HttpResponse:
    tag = get_object_or_404(Tag, slug=slug)
    return _answer(request, "memapp/book_list.html",
                   {"books": tag.books.select_related("author")[:PER_PAGE], "page": 1,
                    "heading": f"#{tag.slug}"})


def section(request: HttpRequest, section: int, pk: int) -> HttpResponse:
    links = [reverse(f"memapp:section-{n}", args=[pk]) for n in range(section, section + 20)]
    return _answer(request, "memapp/section.html",
                   {"section": section, "pk": pk, "links": links})
