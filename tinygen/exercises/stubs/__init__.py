"""The exercise files that `tinygen exercises start DIR` copies, one per exercise, in
learning-path order. They import nothing from tinygen: a learner fills them in.
tinygen itself never imports them (the grader reads their signatures only)."""
