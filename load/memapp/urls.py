"""A few hundred patterns, as a grown site has: the resolver and reverse() caches fill per
process on first use."""

from django.urls import path, re_path

from load.memapp import views

app_name = "memapp"
SECTIONS = 300

urlpatterns = [
    path("", views.book_list, name="books"),
    path("books/<int:pk>/", views.book_detail, name="book"),
    path("authors/", views.author_list, name="authors"),
    path("authors/<slug:slug>/", views.author_detail, name="author"),
    path("tags/<slug:slug>/", views.tag_detail, name="tag"),
]
urlpatterns += [
    re_path(rf"^section-{n}/(?P<pk>[0-9]+)/(?:[a-z-]+/)?$", views.section,
            {"section": n}, name=f"section-{n}")
    for n in range(SECTIONS)
]
