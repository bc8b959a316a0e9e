"""Writes instructions.jsonl: the project's own Alpaca-format instruction set,
written for this project in the embedded default model's register (Early
Modern English; it was trained on Shakespeare, Milton and the KJV Bible).
Short questions, short answers. Some kinds are laid out from word lists
(the old tongue's verb forms, sums, opposites), the rest is written out here.
Kinds are interleaved, one of each per round and the order rotated every
round, so the held-out split (every 10th record, chat/instructions.py
HELDOUT_EVERY) samples every kind.

  python -m dynamo_jax.chat.data.make_instructions   # rewrites the file
"""

from __future__ import annotations

import itertools
import json
import os

NUMBERS = ("nought one two three four five six seven eight nine ten eleven "
           "twelve thirteen fourteen fifteen sixteen seventeen eighteen "
           "nineteen twenty").split()
OLD = "Put this into the speech of old."


def old_tongue():
  """Modern sentences and their Early Modern forms."""
  adjectives = ["kind", "wise", "weary", "merry", "cruel", "gentle", "proud",
                "honest", "late", "welcome", "too bold", "fair"]
  nouns = [("a good heart", "a good heart"), ("my word", "my word"),
           ("no money", "no money"), ("a sharp tongue", "a sharp tongue"),
           ("many friends", "many friends"), ("a fair face", "a fair face")]
  verbs = [("love", "love"), ("know", "know"), ("fear", "fear"),
           ("remember", "remember"), ("hear", "hear"), ("see", "see")]
  objects = ["the king", "my brother", "the sea", "this place", "her name",
             "the way home"]
  out = []
  for adj in adjectives:
    out.append(("You are " + adj + ".", "Thou art " + adj + "."))
  for modern, old in nouns:
    out.append((f"You have {modern}.", f"Thou hast {old}."))
    out.append((f"He has {modern}.", f"He hath {old}."))
  for (verb, old_verb), obj in zip(verbs, objects):
    out.append((f"Do you {verb} {obj}?", f"Dost thou {old_verb} {obj}?"))
    out.append((f"She does not {verb} {obj}.", f"She doth not {old_verb} {obj}."))
    out.append((f"You will {verb} {obj} tomorrow.",
                f"Thou wilt {old_verb} {obj} on the morrow."))
    out.append((f"Why do you {verb} {obj}?",
                f"Wherefore dost thou {old_verb} {obj}?"))
  for thing, adj in [("sword", "sharp"), ("horse", "swift"), ("house", "cold"),
                     ("father", "old"), ("song", "sweet"), ("servant", "idle"),
                     ("eyes", "bright"), ("answer", "foolish"),
                     ("honour", "spotless"), ("heart", "heavy")]:
    poss = "Thine" if thing[0] in "aeiouh" else "Thy"
    verb = "are" if thing.endswith("s") else "is"
    out.append((f"Your {thing} {verb} {adj}.", f"{poss} {thing} {verb} {adj}."))
  for modern, old in [
      ("Come here.", "Come hither."), ("Go there.", "Get thee thither."),
      ("Where are you going?", "Whither goest thou?"),
      ("Where do you come from?", "Whence comest thou?"),
      ("Please listen to me.", "Prithee, hark to me."),
      ("Yes, I will.", "Aye, that I will."), ("No, I will not.", "Nay, I will not."),
      ("It seems to me you are sad.", "Methinks thou art sad."),
      ("Perhaps he will come soon.", "Mayhap he will come anon."),
      ("Before the night ends, I will go.", "Ere the night be done, I will go."),
      ("Truly, I do not know.", "Verily, I know not."),
      ("Look over there!", "Look yonder!"),
      ("Who are you?", "Who art thou?"), ("What do you want?", "What wouldst thou?"),
      ("I thank you.", "I thank thee."), ("Goodbye, my friend.", "Fare thee well, my friend."),
      ("Why are you here?", "Wherefore art thou here?"),
      ("I do not believe you.", "I believe thee not."),
      ("Shame on you!", "Fie upon thee!"), ("He said no.", "Quoth he, nay."),
  ]:
    out.append((modern, old))
  return [dict(instruction=OLD, input=m, output=o) for m, o in out]


def sums():
  out = []
  pairs = [(a, b) for a in range(1, 11) for b in range(1, 11) if a <= b]
  for a, b in pairs[::2][:30]:
    out.append(dict(instruction=f"How many are {NUMBERS[a]} and {NUMBERS[b]}?",
                    input="", output=f"{NUMBERS[a].capitalize()} and "
                    f"{NUMBERS[b]} make {NUMBERS[a + b]}."))
  for a, b in [(10, 3), (9, 4), (8, 8), (7, 2), (6, 5), (12, 7), (5, 5),
               (20, 10)]:
    out.append(dict(instruction=f"Take {NUMBERS[b]} from {NUMBERS[a]}. What "
                    "is left?", input="", output=f"Take {NUMBERS[b]} from "
                    f"{NUMBERS[a]}, and {NUMBERS[a - b]} remain."))
  return out


def opposites():
  pairs = [("day", "night"), ("light", "darkness"), ("love", "hate"),
           ("war", "peace"), ("young", "old"), ("rich", "poor"),
           ("wise", "foolish"), ("strong", "weak"), ("joy", "sorrow"),
           ("life", "death"), ("truth", "falsehood"), ("friend", "foe"),
           ("summer", "winter"), ("hot", "cold"), ("sweet", "bitter"),
           ("high", "low"), ("first", "last"), ("master", "servant"),
           ("morning", "evening"), ("east", "west"), ("north", "south"),
           ("laughter", "weeping"), ("give", "take"), ("open", "shut"),
           ("begin", "end"), ("full", "empty"), ("fair", "foul"),
           ("brave", "cowardly"), ("gentle", "cruel"), ("bless", "curse"),
           ("lend", "borrow"), ("come", "go"), ("rise", "fall"),
           ("early", "late"), ("near", "far"), ("sleep", "wake")]
  return [dict(instruction=f"What is the opposite of {a}?", input="",
               output=f"The opposite of {a} is {b}.") for a, b in pairs]


def old_words():
  words = [
      ("thou", "you, said to one person", "Thou art my friend."),
      ("thee", "you, when you are the one spoken to or of", "I give thee my hand."),
      ("thy", "your", "Thy house is fair."),
      ("thine", "yours, or your before a vowel", "This cloak is thine."),
      ("ye", "you, said to many", "Ye are welcome, all."),
      ("art", "are, with thou", "Thou art weary."),
      ("hath", "has", "He hath a horse."),
      ("doth", "does", "She doth sing well."),
      ("wilt", "will, with thou", "Wilt thou come?"),
      ("shalt", "shall, with thou", "Thou shalt not steal."),
      ("ere", "before", "Come ere the sun be set."),
      ("anon", "soon, in a little while", "I will come anon."),
      ("hither", "to this place", "Come hither, boy."),
      ("thither", "to that place", "Go thither and wait."),
      ("whither", "to what place", "Whither goest thou?"),
      ("whence", "from what place", "Whence camest thou?"),
      ("wherefore", "why", "Wherefore weepest thou?"),
      ("prithee", "I pray thee, that is, please", "Prithee, sit down."),
      ("forsooth", "in truth", "Forsooth, he is a fool."),
      ("hark", "listen", "Hark, the bell doth ring."),
      ("mayhap", "perhaps", "Mayhap it will rain."),
      ("oft", "often", "I have oft seen him."),
      ("nay", "no", "Nay, I will not go."),
      ("aye", "yes", "Aye, my lord."),
      ("morrow", "the next day, or the morning", "Good morrow, sir."),
      ("betwixt", "between", "Betwixt the hills there lies a vale."),
      ("fie", "shame, a cry against something ill done", "Fie upon thee!"),
      ("methinks", "it seems to me", "Methinks the night is long."),
      ("verily", "truly", "Verily, I say it."),
      ("yonder", "over there", "See yonder tower."),
      ("knave", "a rogue, a dishonest man", "Thou art a knave."),
      ("thrice", "three times", "The cock crew thrice."),
      ("twain", "two", "He cut the rope in twain."),
      ("quoth", "said", "Quoth the king, be still."),
      ("sirrah", "a word for a man or boy of low rank, said with scorn",
       "Sirrah, fetch my horse."),
  ]
  return [dict(instruction=f"What meaneth the word '{w}'?", input="",
               output=f"'{w.capitalize()}' is an old word for {m}; as in: "
               f"{ex}") for w, m, ex in words]


COUNSEL = {
    "sad": "Weep not too long, for sorrow is a guest and not a master; seek thy friends, and the morning shall bring thee comfort.",
    "angry": "Hold thy tongue until thy blood be cool, for words spoken in wrath are hard to call back.",
    "proud": "Be humble, for pride goeth before a fall, and the highest tree is first struck by the storm.",
    "afraid": "Take heart; fear maketh the danger greater than it is, and a brave step is half the way.",
    "weary": "Rest thee awhile, for even the ox must lie down; thou shalt rise stronger on the morrow.",
    "poor": "Be not ashamed of thy want; labour honestly, spend little, and a rich man's friendship is not worth thy honour.",
    "lonely": "Go out among thy neighbours and do them some kindness, and thou shalt not be long alone.",
    "jealous": "Let not envy eat thy heart; another's good taketh nothing from thine.",
    "idle": "Up, and set thy hand to some work, for the idle man's field is full of weeds.",
    "in love": "Speak plainly and be true, for love that is honest needeth no fine words.",
    "grieving": "Remember the dead with love, but live; they would not have thee die with them.",
    "sick": "Keep thy bed, take what the physician giveth, and be patient, for health returneth slowly.",
    "young": "Hear the counsel of the old, keep thy word, and be not hasty in anger nor in love.",
    "old": "Give thy wisdom freely to the young, and be merry, for thy days are a gift.",
    "in doubt": "Sleep upon it, and ask one wiser than thyself; a choice made in haste is oft repented.",
    "impatient": "Patience, friend; the fruit that is plucked too soon is sour.",
    "greedy": "Thou canst carry nothing out of the world; give, and thou shalt be richer in thy heart.",
    "boastful": "Let another praise thee, and not thine own mouth.",
    "lost": "Stand still and mark the sun; ask the way of honest folk, and thou shalt come home.",
    "ashamed": "Confess thy fault and mend it; a fault owned is half forgiven.",
    "going on a journey": "Go with a light purse and a merry heart, trust few, and send word home.",
    "a soldier": "Be brave in battle and merciful after it, and obey thy captain.",
    "a king": "Rule with justice and hear the poor, for a crown is a burden, not a toy.",
    "a student": "Read much, think more, and be not ashamed to ask what thou knowest not.",
    "a merchant": "Deal honestly, keep true weights, and thy name shall be worth more than thy gold.",
}


def counsel():
  return [dict(instruction=f"Give counsel to one who is {who}.", input="",
               output=text) for who, text in COUNSEL.items()]


DESCRIBE = {
    "the sea": "The sea is wide and salt and never still; it beareth ships and swalloweth them.",
    "the moon": "The moon is the pale lamp of the night, and she changeth her face every week.",
    "the sun": "The sun is the bright eye of heaven, that riseth in the east and giveth warmth to all.",
    "a storm": "A storm is a fury of wind and rain, with thunder that shaketh the house.",
    "winter": "Winter is the cold season, when the trees are bare and the fields lie under snow.",
    "spring": "Spring is the young season, when the buds open and the birds sing again.",
    "summer": "Summer is the warm season of long days, when the corn groweth tall.",
    "autumn": "Autumn is the season of harvest, when the leaves turn gold and fall.",
    "a rose": "A rose is a sweet flower, red or white, fair to see but guarded by thorns.",
    "the night": "The night is dark and still, the time of sleep and of the stars.",
    "the dawn": "The dawn is the first grey light, when the lark riseth and the darkness flieth.",
    "a forest": "A forest is a great company of trees, green and shady, where the deer do hide.",
    "a river": "A river is running water that goeth ever down to the sea.",
    "the stars": "The stars are small fires in the heavens, more than any man can number.",
    "a lion": "A lion is a great and fierce beast, the king of beasts, with a mane and a mighty roar.",
    "a dove": "A dove is a gentle bird, white or grey, a sign of peace.",
    "a serpent": "A serpent is a creeping beast without legs, subtle and oft venomous.",
    "a mountain": "A mountain is a great hill that reacheth toward the clouds, with snow upon its head.",
    "rain": "Rain is water falling from the clouds, that maketh the earth green.",
    "snow": "Snow is frozen rain, soft and white, that covereth the ground in winter.",
    "a garden": "A garden is ground tended with care, full of flowers, herbs and fruit trees.",
    "the wind": "The wind is moving air; no man seeth it, yet it bendeth the trees.",
    "fire": "Fire is hot and bright; it warmeth the house and burneth whatsoever it toucheth.",
    "a ship": "A ship is a great vessel of wood with sails, that carrieth men over the sea.",
    "a city": "A city is a great town with walls and markets, full of people and noise.",
    "a castle": "A castle is a strong house of stone with towers and walls, built for war.",
    "a battle": "A battle is a fight of armies, with swords and drums, and many men slain.",
    "a feast": "A feast is a great meal with meat and wine, and music and merry guests.",
    "a crown": "A crown is a ring of gold set with jewels, worn upon the head of a king.",
    "an old man": "An old man hath grey hair and a slow step, but much wisdom.",
}


def describe():
  return [dict(instruction=f"Describe {thing} in few words.", input="",
               output=text) for thing, text in DESCRIBE.items()]


WHO = {
    "Adam": "Adam was the first man, made by God of the dust of the ground and set in the garden of Eden.",
    "Eve": "Eve was the first woman, the wife of Adam, who ate of the forbidden fruit.",
    "Noah": "Noah was the righteous man who built the ark and was saved with his house from the flood.",
    "Abraham": "Abraham was the father of the faithful, whom God called out of Ur and promised a great people.",
    "Moses": "Moses led the children of Israel out of Egypt and received the law upon mount Sinai.",
    "David": "David was the shepherd boy who slew Goliath with a stone, and after became king of Israel.",
    "Goliath": "Goliath was the giant of the Philistines, slain by young David with a sling.",
    "Solomon": "Solomon was the son of David, a king famed for his wisdom, who built the temple.",
    "Samson": "Samson was a judge of Israel of great strength, whose strength lay in his hair.",
    "Jonah": "Jonah was the prophet who fled from God and was swallowed by a great fish.",
    "Daniel": "Daniel was a prophet in Babylon, cast into the den of lions and kept safe by God.",
    "Elijah": "Elijah was a prophet of Israel who went up by a whirlwind into heaven.",
    "Joseph, the son of Jacob": "Joseph was sold into Egypt by his brethren, and rose to be ruler there under Pharaoh.",
    "Ruth": "Ruth was a woman of Moab who would not leave Naomi, and became the wife of Boaz.",
    "Esther": "Esther was the queen of Persia who saved her people, the Jews, from Haman.",
    "Job": "Job was a patient man who lost all he had, yet would not curse God.",
    "Cain": "Cain was the first son of Adam, who slew his brother Abel.",
    "Abel": "Abel was a keeper of sheep, the brother of Cain, who slew him.",
    "Jacob": "Jacob was the son of Isaac, also called Israel, the father of twelve sons.",
    "Peter": "Peter was a fisherman and an apostle of Jesus, who denied him thrice.",
    "Paul": "Paul was an apostle who wrote many letters to the churches, and was once called Saul.",
    "John the Baptist": "John the Baptist preached in the wilderness and baptized in the river Jordan.",
    "Hamlet": "Hamlet was a prince of Denmark in Shakespeare's play, who sought to avenge his father's murder.",
    "Macbeth": "Macbeth was a Scottish lord in Shakespeare's play, who slew his king to take the crown.",
    "Lady Macbeth": "Lady Macbeth was the wife of Macbeth, who urged him to the murder and after walked in her sleep.",
    "Romeo": "Romeo was a young Montague of Verona who loved Juliet, the daughter of his house's enemy.",
    "Juliet": "Juliet was the daughter of the Capulets, who loved Romeo and died for him.",
    "Othello": "Othello was the Moor of Venice, a general deceived by Iago into killing his wife.",
    "Iago": "Iago was Othello's ensign, a false villain who made his master jealous.",
    "King Lear": "King Lear was an old king who gave his kingdom to his flattering daughters and was cast out.",
    "Prospero": "Prospero was the rightful duke of Milan, a magician who ruled an island in The Tempest.",
    "Falstaff": "Falstaff was a fat and merry knight, a companion of Prince Hal, full of jests.",
    "Shylock": "Shylock was the moneylender of Venice who asked a pound of flesh from Antonio.",
    "Puck": "Puck was a merry spirit in A Midsummer Night's Dream, the servant of Oberon.",
    "Ophelia": "Ophelia was the daughter of Polonius, who loved Hamlet and was drowned.",
    "Brutus": "Brutus was a Roman who joined in the killing of Julius Caesar for the love of Rome.",
    "Satan in Paradise Lost": "In Milton's poem Satan is the fallen angel who rebelled against God and tempted Eve.",
}


def who():
  return [dict(instruction=f"Who was {name}?", input="", output=text)
          for name, text in WHO.items()]


def greetings():
  people = [("a king", "Long live your majesty! God keep thee and thy crown."),
            ("a friend", "Good morrow, friend! How dost thou this fair day?"),
            ("a stranger", "God save thee, stranger; whence comest thou?"),
            ("a mother", "Good morrow, dear mother; I pray thee, how fares thy health?"),
            ("a child", "Good morrow, little one! Art thou merry today?"),
            ("a priest", "Good morrow, good father; give me thy blessing."),
            ("a soldier", "Hail, good soldier! Thou art welcome home from the wars."),
            ("a shepherd", "Good day, shepherd; how do thy sheep?"),
            ("a queen", "God save your grace, most gracious queen."),
            ("a guest at a feast", "Welcome, good guest; sit and eat, and be merry."),
            ("a traveller at an inn", "Welcome, traveller; here is meat, fire and a bed."),
            ("an old neighbour", "Good even, neighbour; the years sit lightly on thee.")]
  out = [dict(instruction="Write a greeting to the person named.", input=p,
              output=text) for p, text in people]
  farewells = [("a friend going to sea", "Fare thee well; God send thee fair winds and a safe return."),
               ("a dying father", "Farewell, dear father; thy name shall live in us."),
               ("a guest at night", "Good night, and sleep well; we shall meet at morning."),
               ("a brother going to war", "Farewell, brother; be brave, and come home to us."),
               ("a teacher", "Farewell, good master; I shall not forget thy lessons."),
               ("a lover at dawn", "Farewell, sweet love, till the night bring thee to me again.")]
  out += [dict(instruction="Write a farewell to the person named.", input=p,
               output=text) for p, text in farewells]
  return out


def names():
  lists = [("colours", ["red", "green", "blue", "white", "black"]),
           ("beasts", ["the lion", "the horse", "the ox", "the wolf"]),
           ("birds", ["the lark", "the nightingale", "the raven", "the dove"]),
           ("flowers", ["the rose", "the lily", "the violet", "the daisy"]),
           ("trees", ["the oak", "the elm", "the cedar", "the willow"]),
           ("metals", ["gold", "silver", "iron", "brass"]),
           ("virtues", ["faith", "hope", "charity", "patience"]),
           ("seasons", ["spring", "summer", "autumn", "winter"]),
           ("elements", ["earth", "water", "air", "fire"]),
           ("senses", ["sight", "hearing", "smell", "taste", "touch"]),
           ("Gospels", ["Matthew", "Mark", "Luke", "John"]),
           ("books of Moses", ["Genesis", "Exodus", "Leviticus", "Numbers",
                               "Deuteronomy"])]
  out = []
  for (cat, items), n in zip(lists, itertools.cycle([2, 3, 4])):
    n = min(n, len(items))
    chosen = items[:n]
    said = ", ".join(chosen[:-1]) + " and " + chosen[-1]
    out.append(dict(instruction=f"Name {NUMBERS[n]} {cat}.", input="",
                    output=f"{NUMBERS[n].capitalize()} {cat}: {said}."))
  for cat, items in lists[7:]:
    said = ", ".join(items[:-1]) + " and " + items[-1]
    out.append(dict(instruction=f"How many {cat} are there, and what are "
                    "they?", input="", output=f"There are {NUMBERS[len(items)]}"
                    f" {cat}: {said}."))
  return out


def yes_no():
  facts = [("Is fire hot?", "Aye, fire is hot, and burneth whoso toucheth it."),
           ("Is snow black?", "Nay, snow is white."),
           ("Is the sea salt?", "Aye, the sea is salt; no man may drink of it."),
           ("Doth the sun rise in the west?", "Nay, the sun riseth in the east and setteth in the west."),
           ("Can a fish fly?", "Nay, a fish swimmeth in the water; it is the bird that flieth."),
           ("Is honey sweet?", "Aye, honey is sweet, the gift of the bees."),
           ("Hath a horse four legs?", "Aye, a horse hath four legs."),
           ("Hath a bird four wings?", "Nay, a bird hath two wings."),
           ("Is iron heavier than a feather?", "Aye, iron is far heavier than a feather."),
           ("Is the night brighter than the day?", "Nay, the day is brighter, for the sun shineth by day."),
           ("Doth water run uphill?", "Nay, water runneth down, ever toward the sea."),
           ("Is the lion a gentle beast?", "Nay, the lion is fierce and strong."),
           ("Is a lie an honest thing?", "Nay, a lie is false, and shameth him that telleth it."),
           ("Is a week seven days?", "Aye, a week hath seven days."),
           ("Is a year twelve months?", "Aye, a year hath twelve months."),
           ("Hath a man two hands?", "Aye, a man hath two hands and ten fingers."),
           ("Is the moon made of cheese?", "Nay, that is a jest for children."),
           ("Doth the owl fly by night?", "Aye, the owl waketh by night and sleepeth by day."),
           ("Is gold worth more than lead?", "Aye, gold is precious and lead is base."),
           ("Is the oak a small tree?", "Nay, the oak is a great and strong tree."),
           ("Doth ice melt in the sun?", "Aye, ice melteth in the sun and turneth to water."),
           ("Can a man live without bread?", "Not long; yet man shall not live by bread alone."),
           ("Is mercy a virtue?", "Aye, mercy is a virtue, and becometh a king better than his crown."),
           ("Is winter warmer than summer?", "Nay, winter is the cold season and summer the warm."),
           ("Doth the cock crow at morning?", "Aye, the cock croweth at the break of day."),
           ("Are there twelve hours in a day?", "There are four and twenty hours in a day and a night."),
           ("Can a sheep sing?", "Nay, a sheep bleateth; it is the bird that singeth."),
           ("Is wine made of grapes?", "Aye, wine is pressed from grapes."),
           ("Is the wolf a friend to the sheep?", "Nay, the wolf devoureth the sheep."),
           ("Is it wise to trust a flatterer?", "Nay, a flatterer speaketh fair and meaneth ill.")]
  return [dict(instruction=q, input="", output=a) for q, a in facts]


def records() -> list[dict[str, str]]:
  """Every record: kinds interleaved, the order rotated every round."""
  kinds = [old_tongue(), sums(), opposites(), old_words(), counsel(),
           describe(), who(), greetings(), names(), yes_no()]
  out = []
  for k, group in enumerate(itertools.zip_longest(*kinds)):
    k %= len(group)
    out.extend(r for r in group[k:] + group[:k] if r is not None)
  return out


def main() -> None:
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "instructions.jsonl")
  with open(path, "w", encoding="utf-8") as fh:
    for record in records():
      fh.write(json.dumps(record, ensure_ascii=False) + "\n")
  print(f"wrote {len(records())} records to {path}")


if __name__ == "__main__":
  main()
