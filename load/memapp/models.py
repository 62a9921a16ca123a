"""A catalogue: enough relations that the ORM builds real metadata and joins."""

from django.db import models


class Publisher(models.Model):
    name = models.CharField(max_length=100, unique=True)
    city = models.CharField(max_length=60)

    def __str__(self) -> str:
        return self.name


class Author(models.Model):
    name = models.CharField(max_length=100)
    slug = models.SlugField(unique=True)
    born = models.DateField(null=True)

    def __str__(self) -> str:
        return self.name


class Tag(models.Model):
    slug = models.SlugField(unique=True)

    def __str__(self) -> str:
        return self.slug


class Book(models.Model):
    title = models.CharField(max_length=200)
    author = models.ForeignKey(Author, on_delete=models.CASCADE, related_name="books")
    publisher = models.ForeignKey(Publisher, on_delete=models.PROTECT, related_name="books")
    tags = models.ManyToManyField(Tag, related_name="books")
    pages = models.PositiveIntegerField()
    price = models.DecimalField(max_digits=6, decimal_places=2)
    published = models.DateField()

    class Meta:
        ordering = ("title",)

    def __str__(self) -> str:
        return self.title


class Review(models.Model):
    book = models.ForeignKey(Book, on_delete=models.CASCADE, related_name="reviews")
    stars = models.PositiveSmallIntegerField()
    text = models.TextField()
